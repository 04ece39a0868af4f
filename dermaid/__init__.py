"""DermAID: skin-lesion classification toolkit. Decision support, never a diagnosis."""
__version__ = "0.1.0"
