"""Training: the sandwich-rule step, DeiT-style optimisation, and the Ray Train
pretraining of the meta-network (Ray is imported only here, in prance/sweep/tune.py
and in sweeps/)."""
