"""Where the package's own files live: default configs, experiment YAMLs, the packaged teacher
and the packaged contest winners."""
import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(PACKAGE_DIR, "configs")
MODEL_CONFIGS = os.path.join(CONFIG_DIR, "models")  # each model_type's default config
DATASET_CONFIGS = os.path.join(CONFIG_DIR, "datasets")  # each builder's default config
EXPERIMENTS = os.path.join(CONFIG_DIR, "experiments")  # the YAMLs users run (the repo's configs/ links here)
ASSETS = os.path.join(PACKAGE_DIR, "assets")
# The winners of the fair contest on the embedded default's val split (compare --tune's
# tuning report, docs/contest/): the knobs the main job runs each method with.
TUNED_SHAPES = os.path.join(CONFIG_DIR, "tuned", "cprd_tiny_shapes.json")
