"""edgetune.sim: `edgetune simulate`, a whole federation on one machine.

`harness` (the real server and one client process per simulated device over loopback HTTP),
`evaluator` (test accuracy of each family's global model, every version), `report`
(`metrics.jsonl`, `summary.json`, the table and the plots) and `references` (the
reference rows every federated result stands beside: probe, centralized, homogeneous,
isolated).
"""

from edgetune._lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "harness": ("Simulation", "run_simulation"),
        "evaluator": ("FamilyEvaluator", "evaluation_plan"),
        "report": ("RoundTable", "write_plots"),
        "references": ("run_reference",),
    },
)
