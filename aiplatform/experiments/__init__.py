"""Online experiments: A/B tests, shadow traffic and canaries of model versions.

Between the registry (which versions exist) and serving (which version answers a request):
an experiment says which variant a user gets (``config``), its revisions and what serving
observed are kept in the storage root (``store``), ``stats`` says whether a variant is better
with p-values that stay valid however often they are read, and ``canary`` ramps a new version
up with an automatic rollback.
"""

from aiplatform.experiments.canary import CanaryPlan, decide, run_canary
from aiplatform.experiments.config import Experiment, Shadow, Variant, load_experiment
from aiplatform.experiments.stats import (
    MetricStats,
    VariantStats,
    latency_and_errors,
    variant_report,
)
from aiplatform.experiments.store import ExperimentStore

__all__ = [
    "CanaryPlan",
    "Experiment",
    "ExperimentStore",
    "MetricStats",
    "Shadow",
    "Variant",
    "VariantStats",
    "decide",
    "latency_and_errors",
    "load_experiment",
    "run_canary",
    "variant_report",
]
