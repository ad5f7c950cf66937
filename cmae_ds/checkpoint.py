"""The public name of the model-file API (`from cmae_ds.checkpoint import load_official_cmae`), kept where scripts
outside this repository (the parity tool, users' notebooks) import it from; the code lives in modelfiles/formats.py."""

from .modelfiles.formats import *  # noqa: F403
from .modelfiles.formats import load_official_classifier, load_official_cmae  # noqa: F401 (named for readers)
