"""A popxl tutorial-style program: train a two-layer MLP classifier with SGD.

Written for the Poplar SDK's popxl; nothing in it knows about the CPU runtime. Run it with
``python -m gptj_popxl.popxl_cpu tests/programs/mlp_sgd.py OUT.npz``. It saves the data, the initial
and final weights and the loss of every step to OUT.npz.
"""
import sys

import numpy as np
import popxl
import popxl.ops as ops
import popxl.transforms as transforms

BATCH, IN, HIDDEN, CLASSES = 8, 6, 16, 4
STEPS, LR = 5, 0.1


class Linear(popxl.Module):
    def __init__(self):
        self.W = None
        self.b = None

    def build(self, x: popxl.Tensor, out_features: int) -> popxl.Tensor:
        self.W = popxl.graph_input((x.shape[-1], out_features), popxl.float32, "W")
        self.b = popxl.graph_input((out_features,), popxl.float32, "b")
        return x @ self.W + self.b


class Net(popxl.Module):
    def __init__(self):
        self.fc1 = Linear()
        self.fc2 = Linear()

    def build(self, x: popxl.Tensor, labels: popxl.Tensor) -> popxl.Tensor:
        h = ops.gelu(self.fc1(x, HIDDEN))
        probs = ops.softmax(self.fc2(h, CLASSES), axis=-1)
        return ops.nll_loss(probs, labels)


def main(out_path: str) -> None:
    rng = np.random.default_rng(0)
    init = {
        "W1": rng.normal(0, 0.5, (IN, HIDDEN)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "W2": rng.normal(0, 0.5, (HIDDEN, CLASSES)).astype(np.float32),
        "b2": rng.normal(0, 0.1, CLASSES).astype(np.float32),
    }
    xs = rng.normal(size=(STEPS, BATCH, IN)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=(STEPS, BATCH)).astype(np.int32)

    ir = popxl.Ir()
    with ir.main_graph:
        x_stream = popxl.h2d_stream((BATCH, IN), popxl.float32, "x")
        label_stream = popxl.h2d_stream((BATCH,), popxl.int32, "labels")
        variables = {name: popxl.variable(value, name=name) for name, value in init.items()}

        net = Net()
        fwd = ir.create_graph(net, x_stream.spec, label_stream.spec)
        params = [net.fc1.W, net.fc1.b, net.fc2.W, net.fc2.b]
        bwd_info = transforms.autodiff(fwd, grads_required=params)

        x, y = ops.host_load(x_stream), ops.host_load(label_stream)
        fwd_info = ops.call_with_info(fwd, x, y, inputs_dict={
            net.fc1.W: variables["W1"], net.fc1.b: variables["b1"],
            net.fc2.W: variables["W2"], net.fc2.b: variables["b2"]})
        loss = fwd_info.parent_output(0)

        grads = ops.call(bwd_info.graph, popxl.constant(1.0), inputs_dict=bwd_info.inputs_dict(fwd_info))
        grad_of = dict(zip(bwd_info.outputs, grads))
        for name, param in zip(("W1", "b1", "W2", "b2"), params):
            ops.var_updates.accumulate_(variables[name], grad_of[param], f=-LR)

        loss_stream = popxl.d2h_stream(loss.shape, loss.dtype, "loss")
        ops.host_store(loss_stream, loss)

    losses = []
    with popxl.Session(ir, "ipu_model") as session:
        for step in range(STEPS):
            out = session.run({x_stream: xs[step], label_stream: labels[step]})
            losses.append(float(out[loss_stream]))
            print(f"step {step}: loss {losses[-1]:.6f}")
        final = {name: session.get_tensor_data(v) for name, v in variables.items()}

    np.savez(out_path, xs=xs, labels=labels, losses=np.array(losses),
             **{f"init_{k}": v for k, v in init.items()}, **{f"final_{k}": v for k, v in final.items()})


if __name__ == "__main__":
    main(sys.argv[1])
