"""Model zoo for attnopt's tests: real transformers models from tiny configs, hand-written
attention modules, and their export flavours (dynamo, .pt2, ONNX), each with expected specs."""
