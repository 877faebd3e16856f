"""Pins the one private Lightning name the project reads (``align/module.py``), so that a Lightning upgrade that
changes it fails here rather than silently: ``_given_hyperparameters``, the context variable through which
LightningCLI hands a module its config (there is no public way to tell a CLI-built module from one built in
Python)."""

from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters, _given_hyperparameters_context

from align import HarmonizedClassifier
from align.models import small_cnn


def test_given_hyperparameters_is_the_cli_config_inside_its_context_and_none_outside():
    assert _given_hyperparameters.get() is None
    plain = HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1), harmonization_weight=0.5)
    assert "backbone" not in plain.hparams and plain.hparams["harmonization_weight"] == 0.5  # objects are not saved

    backbone = {"class_path": "align.models.small_cnn", "init_args": {"num_classes": 4, "widths": [8], "depth": 1}}
    config = {**plain.hparams, "backbone": backbone}  # what the CLI passes: every argument, as config
    with _given_hyperparameters_context(hparams=config, instantiator="lightning.pytorch.cli.instantiate_module"):
        assert _given_hyperparameters.get()["backbone"] == backbone
        from_cli = HarmonizedClassifier(small_cnn(4, widths=(8,), depth=1), harmonization_weight=0.5)
    assert _given_hyperparameters.get() is None
    assert from_cli.hparams["backbone"] == backbone  # the config, from which load_from_checkpoint rebuilds it
