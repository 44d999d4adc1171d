"""Dock widgets of napari-smear (each module imports torch lazily, if at all).

Also the session's list of user model files (:data:`user_models`): models trained with
the "Train classifier" widget, or opened in the "Classify cells" widget, are added
to it, and every "Classify cells" widget offers them next to the built-in models.
"""
from __future__ import annotations

import os
from pathlib import Path

from psygnal import Signal

__all__ = ["UserModelFiles", "user_models"]


class UserModelFiles:
    """Model files known to this napari session, most recent first.

    The list lives for the session (it is not saved); ``changed`` is emitted with the
    new tuple of paths whenever a file is added or removed.
    """

    changed = Signal(tuple)

    def __init__(self) -> None:
        self._paths: list[Path] = []

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(self._paths)

    def add(self, path: str | os.PathLike) -> Path:
        """Check that ``path`` is a napari-smear model file and put it first.

        Raises
        ------
        napari_smear.models.ModelFileError
            The file is missing or is not a napari-smear model file (its metadata is read,
            not its weights).
        """
        from napari_smear.models import read_metadata

        path = Path(path).expanduser().resolve()
        read_metadata(path)
        self._paths = [path] + [p for p in self._paths if p != path]
        self.changed.emit(self.paths)
        return path

    def remove(self, path: str | os.PathLike) -> None:
        path = Path(path).expanduser().resolve()
        if path in self._paths:
            self._paths.remove(path)
            self.changed.emit(self.paths)

    def clear(self) -> None:
        if self._paths:
            self._paths.clear()
            self.changed.emit(self.paths)


#: The session's user model files (shared by all widgets of the session).
user_models = UserModelFiles()
