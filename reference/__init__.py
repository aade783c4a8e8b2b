"""Pure-PyTorch reference implementations: the executable specification of every dqfast op.

Readable, CPU-runnable and differentiable by autograd. Never imports Triton.
"""
