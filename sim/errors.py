"""One error type for bad user input: the CLI prints its message on one line and exits 2."""


class KvsimError(Exception):
    """Bad input (config, trace, CLI argument). The message names the file, the key and what was expected."""


def where(path, key):
    """'file: key' prefix used by every input error so the user knows exactly what to fix."""
    if path and key:
        return f"{path}: {key}"
    return str(path or key or "<input>")
