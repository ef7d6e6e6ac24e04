"""The main job of the README: MultiMNIST and instance-wise risk minimisation on real MNIST
digits (``python -m examples.multimnist``)."""
