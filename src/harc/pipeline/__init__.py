"""`harc run`: the whole loop over one run folder, resumable stage by stage."""

from harc.pipeline.config import RunConfig, RunSettings, load_run_config
from harc.pipeline.run import Pipeline, run_pipeline

__all__ = ["Pipeline", "RunConfig", "RunSettings", "load_run_config", "run_pipeline"]
