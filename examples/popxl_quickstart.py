"""A popxl program run on the CPU: y = gelu(x @ w) on two replicas, then one SGD step on w."""
import numpy as np

from gptj_popxl.backend import ops, popxl

ir = popxl.Ir(replication=2)
with ir.main_graph:
    w = popxl.variable(np.full((4, 3), 0.5, np.float32), name="w")
    x_stream = popxl.h2d_stream((2, 4), popxl.float32, "x")
    loss_stream = popxl.d2h_stream((), popxl.float32, "loss")

    def forward(x, w):
        return ops.sum(ops.gelu(x @ w))

    fwd = ir.create_graph(forward, popxl.TensorSpec((2, 4), popxl.float32), w)
    bwd = popxl.transforms.autodiff(fwd)
    fwd_site = ops.call_with_info(fwd, ops.host_load(x_stream), w)
    (loss,) = fwd_site.outputs[:1]
    _, dw = ops.call(bwd.graph, popxl.constant(1.0), inputs_dict=bwd.inputs_dict(fwd_site))
    ops.host_store(loss_stream, loss)
    ops.scaled_add_(w, dw, b=-0.1)

with popxl.Session(ir) as session:
    outputs = session.run({x_stream: np.ones((2, 2, 4), np.float32)})  # (replicas, *shape)
    print("loss per replica:", outputs[loss_stream])
    print("w after one step:\n", session.get_tensor_data(w))
