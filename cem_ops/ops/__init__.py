"""Python side of the torch.ops.cem operators: typed wrappers, fake implementations, autograd
registrations and the reference fallback for backends without a compiled kernel."""
