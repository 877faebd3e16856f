"""Train, validate and test harmonized classifiers from YAML configs (LightningCLI).

    python train.py fit --config configs/shortcut/harmonized_lipschitz.yaml
    python train.py fit --config configs/shortcut/harmonized_lipschitz.yaml --trainer.max_epochs=3 \
        --model.harmonization_weight=2
    python train.py test --config configs/shortcut/harmonized_lipschitz.yaml --ckpt_path runs/.../last.ckpt
    python train.py fit --config configs/shortcut/harmonized_lipschitz.yaml --print_config

The same as ``python -m align.train`` (which also works outside the clone, with the packaged configs: ``--config
shortcut/harmonized_lipschitz``). Every run writes under ``runs/<experiment>/<version>/`` (see ``align.cli``). W&B
runs offline unless you are logged in (``wandb login``) or set ``WANDB_MODE``.
"""

from align.train import main

if __name__ == "__main__":
    main()
