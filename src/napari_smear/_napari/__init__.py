"""napari integration of napari-smear: reader, writer, layers, sample data and widgets.

The only part of the package that imports napari or Qt.
"""
