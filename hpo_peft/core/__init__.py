"""What every layer may use and that knows no model, study or tracking: the typed study config and its YAML file,
user errors, devices and precision, interrupts, and the file locks and storage URLs of the stores.
"""

__all__ = ['config', 'config_file', 'data_config', 'errors', 'runtime', 'interrupts', 'stores']
