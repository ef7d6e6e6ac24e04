"""The multi-task LeNet of Sener & Koltun (NeurIPS 2018) for MultiMNIST: a shared trunk and one
head per task.

The trunk is ``Sequential(encoder, decoder)`` so that the grouping strategies of
:mod:`torchjd.grouping` give four different partitions of its six parameter tensors:

=============  ===========================================  =======
strategy       groups                                       count
=============  ===========================================  =======
together       the whole trunk                              1
per_network    encoder (both convolutions), decoder (fc)    2
per_layer      conv1, conv2, fc                             3
per_tensor     every weight and bias on its own             6
=============  ===========================================  =======
"""

from collections import OrderedDict

from torch import nn

from torchjd import grouping

FEATURES = 50
GROUPINGS = {
    "together": grouping.together,
    "per_network": lambda trunk: grouping.per_network(*trunk.children()),
    "per_layer": grouping.per_layer,
    "per_tensor": grouping.per_tensor,
}


def make_trunk() -> nn.Sequential:
    """LeNet: two 5x5 convolutions with max-pooling, then a 50-unit fully connected layer."""
    encoder = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 10, kernel_size=5),
            pool1=nn.MaxPool2d(2),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(10, 20, kernel_size=5),
            pool2=nn.MaxPool2d(2),
            relu2=nn.ReLU(),
        )
    )
    decoder = nn.Sequential(
        OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(20 * 4 * 4, FEATURES), relu=nn.ReLU())
    )
    return nn.Sequential(OrderedDict(encoder=encoder, decoder=decoder))


def make_head(classes: int = 10) -> nn.Sequential:
    """One task head: a hidden layer of 50 units, then the class scores."""
    return nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.ReLU(), nn.Linear(FEATURES, classes))
