"""Input files of the command lines, checked before any work with the one reader that later uses them."""

from __future__ import annotations

from pathlib import Path

from amygdala_dagster.engine.inputs import InputError, read_inputs


def check_jsonl_input(flag: str, path: str | Path, *, labelled: bool = False) -> Path:
    """Read ``path`` as :func:`~amygdala_dagster.engine.inputs.read_inputs` will in the run; the path.

    Raises :class:`InputError` with one line naming ``flag``, the file and the
    line (``--calibration-texts F.jsonl:3: empty text``); a missing, empty or
    blank file is refused too. ``labelled``: every line needs ``"emotions"``.
    """
    given = Path(path).expanduser()
    try:
        read_inputs(given, labelled=labelled)
    except InputError as exc:
        raise InputError(f"{flag} {exc}") from None
    except OSError as exc:  # a directory, unreadable
        raise InputError(f"{flag} {given}: cannot read it ({exc.strerror or exc})") from None
    return given
