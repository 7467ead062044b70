"""cxrlib: the shared code of the cxr-transfer book (COVID-19 chest X-ray transfer learning).

Research code, not a diagnostic device.
"""

from .config import CLASSES, LABELS, RunConfig, classes, task_label
from .errors import CXRError

__all__ = ["CLASSES", "LABELS", "RunConfig", "CXRError", "classes", "task_label"]
__version__ = "0.1.0"
