"""Stage 1: features from raw recordings (face crops, physiological windows, log-mel audio):
:func:`pkdot.features.extract.run_extract` writes the tables :mod:`pkdot.features.schema` reads."""
