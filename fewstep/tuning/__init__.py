"""Everything that makes a tuned artifact for a model: DC calibration and CPR, EMS, S3 and timestep searches."""
