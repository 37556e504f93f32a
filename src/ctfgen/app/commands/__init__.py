"""The `ctfgen` commands (see ctfgen.app.cli); this file is all `ctfgen --help` loads of them."""

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """Ends an option's help with its default, unless it has none (None, a flag) or the help says it in words."""

    def _get_help_string(self, action):
        shown = action.option_strings and action.nargs != 0 and action.default is not None
        return action.help + " (default: %(default)s)" if shown and "default" not in action.help else action.help
