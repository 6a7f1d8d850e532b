"""Searches that write solver schedules: S3 over USF strategies, and tuned timesteps for any solver."""

from fewstep.tuning.search.s3 import USFSearchConfig, run_usf_search, search_usf
from fewstep.tuning.search.timesteps import TimestepSearchConfig, run_timestep_search, search_timesteps

__all__ = ["USFSearchConfig", "TimestepSearchConfig", "search_usf", "search_timesteps", "run_usf_search",
           "run_timestep_search"]
