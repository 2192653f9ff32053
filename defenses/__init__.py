"""Built-in defenses: every module here registers its defense (see ``nlpbd.methods.DEFENSES``)."""

from nlpbd.discovery import import_submodules

import_submodules(__name__)
