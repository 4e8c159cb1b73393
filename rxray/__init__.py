"""rxray: cell-microscopy deep learning for drug discovery (RxRx2) on Ray."""

__version__ = "0.1.0"
