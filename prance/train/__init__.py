"""Training: the sandwich-rule step, DeiT-style optimisation, and the Ray Train
pretraining of the meta-network (only this package and sweeps/ import Ray)."""
