"""Dock widgets of napari-smear (each module imports torch lazily, if at all)."""
