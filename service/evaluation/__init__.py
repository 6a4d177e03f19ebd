"""How good a model is: metrics (k-NN, reconstruction loss, accuracy), the linear probe,
reconstruction pictures, and the evaluate and reconstruct jobs' drivers."""
