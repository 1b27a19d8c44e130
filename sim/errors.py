"""One error type for bad user input: the CLI prints its message on one line and exits 2."""


class KvsimError(Exception):
    """Bad input (config, trace, CLI argument). The message names the file, the key and what was expected."""


def where(path, key):
    """'file: key' prefix used by every input error so the user knows exactly what to fix."""
    if path and key:
        return f"{path}: {key}"
    return str(path or key or "<input>")


def read_yaml(path, what: str, hint: str = ""):
    """Parse a YAML file or raise a one-line KvsimError: '<file>: <what> not found' or '<file>: line N: invalid YAML'."""
    from pathlib import Path

    import yaml

    p = Path(path)
    if not p.is_file():
        raise KvsimError(f"{path}: {what} not found{hint}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark else ""
        raise KvsimError(f"{path}:{line} invalid YAML: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}") from None
