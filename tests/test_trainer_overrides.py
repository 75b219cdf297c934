"""`QLoRATrainer` overrides private methods of transformers' `Trainer` (checkpoints written atomically, adapters saved
and loaded from `adapter_model/`, the label-only loss). Private methods change without notice: this pins their
signatures, that transformers still calls them, and that nothing else of ours shadows a name of the Trainer, so an
upgrade of transformers fails here, loudly, instead of silently skipping an override."""
import inspect
import pytest
from transformers import Seq2SeqTrainer, Trainer
from qlora_nb.train import QLoRATrainer

# each override, and how transformers' Trainer calls it (the call our override relies on being made)
OVERRIDES = {
    "_save": "self._save(output_dir",
    "_load_from_checkpoint": "self._load_from_checkpoint(resume_from_checkpoint",
    "_load_best_model": "self._load_best_model()",
    "_get_output_dir": "self._get_output_dir(trial",
    "_save_checkpoint": "self._save_checkpoint(model, trial)",
    "compute_loss": "self.compute_loss(model, inputs",
}
# overrides of Seq2SeqTrainer's own methods (which our overrides call), and how transformers' Trainer calls them
SEQ2SEQ_OVERRIDES = {"prediction_step": "self.prediction_step(model, inputs, prediction_loss_only, ignore_keys="}


def shape(f) -> list:
    "(name, kind, default) of each parameter: what a caller relies on; annotations may change freely."
    return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_override_has_the_signature_of_transformers_method(name):
    ours, theirs = vars(QLoRATrainer)[name], getattr(Trainer, name)
    assert shape(ours) == shape(theirs), f"transformers' Trainer.{name} is now {inspect.signature(theirs)}"
    assert getattr(Seq2SeqTrainer, name) is theirs  # our overrides call Seq2SeqTrainer's, which must be the Trainer's


@pytest.mark.parametrize("name", sorted(SEQ2SEQ_OVERRIDES))
def test_override_has_the_signature_of_seq2seq_trainers_method(name):
    ours, theirs = vars(QLoRATrainer)[name], vars(Seq2SeqTrainer)[name]
    assert shape(ours) == shape(theirs), f"transformers' Seq2SeqTrainer.{name} is now {inspect.signature(theirs)}"


@pytest.mark.parametrize("name, call", sorted((OVERRIDES | SEQ2SEQ_OVERRIDES).items()))
def test_transformers_still_calls_it(name, call):
    assert call in inspect.getsource(Trainer), f"Trainer no longer calls {call}...): QLoRATrainer.{name} is skipped"


def test_checkpoint_folder_comes_from_get_output_dir():
    "Checkpoints are staged by `_get_output_dir` answering `.incomplete/` while `_save_checkpoint` runs."
    source = inspect.getsource(Trainer._save_checkpoint)
    assert "run_dir = self._get_output_dir(trial=trial)" in source
    assert "os.path.join(run_dir, checkpoint_folder)" in source


def test_no_other_name_of_ours_shadows_the_trainer():
    ours = {n for n in vars(QLoRATrainer) if not n.startswith("__")}
    assert ours & set(dir(Seq2SeqTrainer)) == set(OVERRIDES) | set(SEQ2SEQ_OVERRIDES)
    assert {"_publish_checkpoint", "_staging", "label_only_loss", "run_config"} <= ours  # the additions, none of theirs
