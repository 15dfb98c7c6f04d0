"""Raw Waymo Open Dataset v1 (TFRecord ``Frame`` records) -> drivestudio layout, without TensorFlow.

Modules: ``tfrecord`` (framing and CRC32C), ``protos`` (the Frame schema subset and its generated
code), ``frame`` (a record -> numpy), ``range_image`` (range images -> LiDAR points), ``boxes``
(instances and dynamic masks), ``convert`` (segments -> scene folders, resumable).
"""
