"""The version of this streamfold (written into cards, reports and the resume fingerprint)."""
__version__ = "0.1.0"
