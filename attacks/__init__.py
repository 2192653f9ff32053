"""Built-in attacks: every module here registers its attack (see ``nlpbd.methods.ATTACKS``)."""

from nlpbd.discovery import import_submodules

import_submodules(__name__)
