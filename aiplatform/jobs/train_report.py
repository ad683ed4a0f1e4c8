"""A training run's report: what ``run_training`` returns, and how the job and the quickstart
print it (a metrics table, one verdict line per baseline) or write it (``--report``)."""

from dataclasses import dataclass, field

from aiplatform.training.recommender import BASELINES, TWO_TOWER, verdict_lines


@dataclass
class TrainingReport:
    model_name: str
    version: int
    promoted: bool
    metrics: dict
    examples: int
    validation_users: int
    cutoff: str
    checkpoint: str
    train_seconds: float
    eval_seconds: float
    aliases: list[str] = field(default_factory=list)
    gates: list[dict] = field(default_factory=list)
    split: str = ""

    @property
    def gates_passed(self) -> bool:
        return all(g["passed"] for g in self.gates)

    @property
    def failed_gates(self) -> list[dict]:
        return [g for g in self.gates if not g["passed"]]

    def beats_baselines(self) -> dict[str, bool]:
        """Per evaluated baseline: is the model ahead on both recall@k and NDCG@k by more than
        two standard errors of the per-user paired difference?"""
        return dict(self.metrics.get("beats_baselines", {}))


def baseline_sentence(metrics: dict, k: int = 10) -> str:
    """One plain sentence: does the model beat each baseline (by two paired standard errors on
    recall@k and NDCG@k)."""
    verdicts = metrics.get("beats_baselines", {})
    if not verdicts:
        return "no baseline was evaluated"
    won = [b for b, ok in verdicts.items() if ok]
    lost = [b for b, ok in verdicts.items() if not ok]
    parts = ([f"beats {', '.join(won)}"] if won else []) + ([f"does NOT beat {', '.join(lost)}"] if lost else [])
    return (f"the model {' and '.join(parts)} (by two standard errors of the per-user difference, on "
            f"{metrics.get('users', 0):,} validation users)")


def format_metrics(metrics: dict) -> str:
    """A fixed-width table (one row per ranker, one column per metric), then one verdict line
    per baseline and the split."""
    rankers = [r for r in ("model", TWO_TOWER, *BASELINES) if isinstance(metrics.get(r), dict)]
    cols = list(metrics["model"])
    rows = [f"{'':12s} " + " ".join(f"{c:>11s}" for c in cols)]
    for name in rankers:
        rows.append(f"{name:12s} " + " ".join(f"{metrics[name].get(c, float('nan')):11.4f}" for c in cols))
    k = int(next((c.split("@")[1] for c in cols if c.startswith("ndcg@")), 10))
    rows += verdict_lines(metrics, k)
    split = metrics.get("split")
    if isinstance(split, dict):
        rows.append(f"evaluation: {split.get('name')}, {metrics.get('users', 0):,} validation users")
    ranker = metrics.get("ranker")
    if isinstance(ranker, dict) and "verdict" in ranker:
        rows.append(ranker["verdict"])
    return "\n".join(rows)
