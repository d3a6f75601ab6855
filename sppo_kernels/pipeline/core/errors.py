"""The one exception type the CLI turns into a clean ``sppo-train: error: ...`` message."""


class PipelineError(Exception):
    """A user-facing problem: bad option, missing or malformed input file, empty prompt set."""
