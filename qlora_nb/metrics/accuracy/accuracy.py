# Accuracy as an `evaluate` metric that ships inside qlora_nb, so it loads offline:
#     evaluate.load(str(Path(qlora_nb.__file__).parent / "metrics" / "accuracy"))
# `evaluate.load("accuracy")` fetches the hub's copy of this script, which fails without network access.
# Same inputs and output as the hub's "accuracy" (`{"accuracy": float}`), computed with numpy only.
"""Accuracy: the fraction of predictions equal to their reference."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
accuracy = (number of predictions equal to their reference) / (number of predictions).
With `sample_weight`, each prediction counts with its weight; with `normalize=False`, the (weighted) number of
correct predictions is returned instead of the fraction.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels, as many as predictions.
    normalize (`bool`): return the fraction (default) or, if False, the number of correct predictions.
    sample_weight (`list` of `float`): optional weight of each prediction.
Returns:
    accuracy (`float` or `int`): in [0, 1] when normalized.
Example:
    >>> metric = evaluate.load("qlora_nb/metrics/accuracy")
    >>> metric.compute(references=[0, 1, 2, 3], predictions=[0, 1, 1, 3])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"),
                                        "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        if len(correct) == 0:
            raise ValueError("accuracy of no predictions is undefined: pass at least one prediction.")
        score = float((correct * weights).sum())
        return {"accuracy": float(score / weights.sum()) if normalize else score}
