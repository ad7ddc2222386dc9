"""Where the package's own files live: default configs, experiment YAMLs, the packaged teacher."""
import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(PACKAGE_DIR, "configs")
MODEL_CONFIGS = os.path.join(CONFIG_DIR, "models")  # each model_type's default config
DATASET_CONFIGS = os.path.join(CONFIG_DIR, "datasets")  # each builder's default config
EXPERIMENTS = os.path.join(CONFIG_DIR, "experiments")  # the YAMLs users run (the repo's configs/ links here)
ASSETS = os.path.join(PACKAGE_DIR, "assets")
