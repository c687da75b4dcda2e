"""The compression stages: one class a method (its yaml in conf/stage/), the interface they share (base.py) and
the calibration driver that feeds the calibrated ones (calibration.py). Loading a stage list from the config is
config/stages.py's job."""
