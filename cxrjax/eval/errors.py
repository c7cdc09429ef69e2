"""Errors that mean "this input file is wrong" (reported as one line by the CLI), as
opposed to bugs (which keep their traceback)."""

from cxrjax.data.images import ImageError
from cxrjax.data.metadata import MetadataError
from cxrjax.data.prepare import PreparedDataError
from cxrjax.data.splits import LeakageError
from cxrjax.eval.leaderboard import LeaderboardError
from cxrjax.eval.model_source import InferenceError
from cxrjax.eval.paths import UnsafePathError
from cxrjax.eval.predictions import PredictionsError
from cxrjax.eval.runinfo import RunInfoError
from cxrjax.models.errors import WeightsError
from cxrjax.workdir import WorkdirError

INPUT_ERRORS = (MetadataError, PredictionsError, RunInfoError, LeaderboardError, UnsafePathError,
                ImageError, WeightsError, InferenceError, PreparedDataError, LeakageError, WorkdirError)
