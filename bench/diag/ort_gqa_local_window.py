"""Probe: ORT's com.microsoft.GroupQueryAttention with local_window_size (CPU) vs MultiHeadAttention with
the band as an additive mask vs attnopt's CPU window kernel, B=1, 4096 tokens, 8/2 heads, D=64, window 512.
Checks exactness against SDPA with the band mask (and that W - 1 / W + 1 are not what ORT computes).

    .venv/bin/python bench/diag/ort_gqa_local_window.py
"""
import numpy as np, onnxruntime as ort, time
from onnx import helper, TensorProto as T
B,S,H,Hkv,D,W=1,4096,8,2,64,512
def model(kind):
    q=helper.make_tensor_value_info("q",T.FLOAT,[B,S,H*D]); k=helper.make_tensor_value_info("k",T.FLOAT,[B,S,Hkv*D]); v=helper.make_tensor_value_info("v",T.FLOAT,[B,S,Hkv*D])
    o=helper.make_tensor_value_info("o",T.FLOAT,[B,S,H*D])
    inits=[]; nodes=[]
    if kind=="gqa":
        inits=[helper.make_tensor("seqlens",T.INT32,[B],[S-1]*B), helper.make_tensor("total",T.INT32,[],[S])]
        nodes=[helper.make_node("GroupQueryAttention",["q","k","v","","","seqlens","total"],["o"],domain="com.microsoft",num_heads=H,kv_num_heads=Hkv,local_window_size=W,scale=D**-0.5)]
    if kind=="mha":
        i=np.arange(S); bias=np.where((i[None,:]<=i[:,None])&(i[None,:]>i[:,None]-W),0,-np.inf).astype(np.float32)[None,None]
        inits=[helper.make_tensor("bias",T.FLOAT,[1,1,S,S],bias.ravel())]
        # repeat kv heads to H for MHA
        nodes=[helper.make_node("Reshape",["k","s5"],["k5"]),helper.make_node("Tile",["k5","rep"],["kt5"]),helper.make_node("Reshape",["kt5","s3"],["kt"]),
               helper.make_node("Reshape",["v","s5"],["v5"]),helper.make_node("Tile",["v5","rep"],["vt5"]),helper.make_node("Reshape",["vt5","s3"],["vt"]),
               helper.make_node("MultiHeadAttention",["q","kt","vt","","","bias"],["o"],domain="com.microsoft",num_heads=H,scale=D**-0.5)]
        inits+=[helper.make_tensor("s5",T.INT64,[5],[B,S,Hkv,1,D]),helper.make_tensor("rep",T.INT64,[5],[1,1,1,H//Hkv,1]),helper.make_tensor("s3",T.INT64,[3],[B,S,H*D])]
    g=helper.make_graph(nodes,"g",[q,k,v],[o],initializer=inits)
    return helper.make_model(g,opset_imports=[helper.make_opsetid("",17),helper.make_opsetid("com.microsoft",1)])
rng=np.random.default_rng(0)
qn=rng.standard_normal((B,S,H*D),dtype=np.float32); kn=rng.standard_normal((B,S,Hkv*D),dtype=np.float32); vn=rng.standard_normal((B,S,Hkv*D),dtype=np.float32)
so=ort.SessionOptions(); so.intra_op_num_threads=2
s=ort.InferenceSession(model("gqa").SerializeToString(), so, providers=["CPUExecutionProvider"])
out=s.run(None,{"q":qn,"k":kn,"v":vn})[0]
# reference
import torch
qt=torch.from_numpy(qn).view(B,S,H,D).transpose(1,2); kt=torch.from_numpy(kn).view(B,S,Hkv,D).transpose(1,2); vt=torch.from_numpy(vn).view(B,S,Hkv,D).transpose(1,2)
i=torch.arange(S); m=(i[None,:]<=i[:,None])&(i[None,:]>i[:,None]-W)
ref=torch.nn.functional.scaled_dot_product_attention(qt,kt,vt,attn_mask=m,enable_gqa=True).transpose(1,2).reshape(B,S,H*D).numpy()
print("err", np.abs(out-ref).max())
for W2 in [W-1, W+1]:
    m2=(i[None,:]<=i[:,None])&(i[None,:]>i[:,None]-W2)
    r2=torch.nn.functional.scaled_dot_product_attention(qt,kt,vt,attn_mask=m2,enable_gqa=True).transpose(1,2).reshape(B,S,H*D).numpy()
    print("W", W2, "err", np.abs(out-r2).max())
s2=ort.InferenceSession(model("mha").SerializeToString(), so, providers=["CPUExecutionProvider"])
print("mha err", np.abs(s2.run(None,{"q":qn,"k":kn,"v":vn})[0]-ref).max())
from attnopt.codegen.ops import attention_op
torch.set_num_threads(2)
ts={"gqa":[],"mha":[],"attnopt":[]}
for _ in range(5):
    for name,f in (("gqa",lambda: s.run(None,{"q":qn,"k":kn,"v":vn})),("mha",lambda: s2.run(None,{"q":qn,"k":kn,"v":vn})),
                   ("attnopt",lambda: attention_op(qt,kt.repeat_interleave(H//Hkv,1),vt.repeat_interleave(H//Hkv,1),scale=D**-0.5,causal=True,window=(W-1,0)))):
        t=time.perf_counter(); f(); ts[name].append(time.perf_counter()-t)
print({k_: round(min(v_)*1e3,1) for k_,v_ in ts.items()})
