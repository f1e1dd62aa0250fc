"""softtriple: deep metric learning with the SoftTriple loss."""
__version__ = "0.1.0"
