"""Training: subject-wise splits, epoch loops, the teacher and student stages and their Ray Train runner."""
