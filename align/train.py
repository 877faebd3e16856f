"""Train, validate and test from YAML configs, also from an installed package (no clone needed).

    python -m align.train fit --config shortcut/harmonized_lipschitz     # a config shipped with the package
    python -m align.train fit --config my_experiment.yaml --trainer.max_epochs=3
    python -m align.train test --config shortcut/harmonized_lipschitz --ckpt_path runs/.../last.ckpt

``--config`` takes a file, or the name of a packaged config (``configs/`` of the repository, with or without
``.yaml``: :func:`align.cli.packaged_configs` lists them). Everything else is :class:`align.cli.AlignCLI`.
"""

import datamodules  # noqa: F401  (imported so that data class_paths may use short names)
from align.cli import main

if __name__ == "__main__":
    main()
