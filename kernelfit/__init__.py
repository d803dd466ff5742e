"""kernelfit: exact (interpolating) kernel regression at full MNIST / CIFAR-10 scale."""

__version__ = "0.1.0"
