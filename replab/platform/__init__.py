"""Ray + MLflow machinery: data, augmentation, training, evaluation, sweeps, scaling fits, tracking.

Nothing here knows about any one method: methods plug in through :mod:`replab.methods.base`.
"""
