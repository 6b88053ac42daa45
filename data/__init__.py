"""Data for the ConvLSTM/ConvGRU experiments.

`data.mm` generates Moving MNIST (Srivastava et al. 2015) on the fly, reads the
fixed test set `mnist_test_seq.npy`, and loads custom sequence arrays. It also runs
as a script: `python -m data.mm --help`.
"""
