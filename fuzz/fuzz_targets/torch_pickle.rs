//! The PyTorch checkpoint reader on arbitrary bytes: once as a `data.pkl` (the restricted
//! unpickler) and once as a whole `pytorch_model.bin` (zip directory, then unpickler, then
//! tensor placement). Neither may panic, hang or allocate without bound, and every tensor
//! the reader accepts must lie inside the file (or inside the buffer of copied strided
//! views), sized by its dtype and shape.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smelt::io::pickle::load_state_dict;
use smelt::io::torch_zip::torch_tensors;

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) = load_state_dict(data) {
        for (name, t) in &tensors {
            assert_eq!(t.shape.len(), t.stride.len(), "{name}: dims and strides differ");
        }
    }
    let Ok((infos, owned)) = torch_tensors(data) else {
        return;
    };
    for t in &infos {
        let bytes = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(t.dtype.size()))
            .expect("an accepted shape's byte count overflows");
        assert_eq!(t.end - t.begin, bytes, "{}: range and shape disagree", t.name);
        if t.begin >= data.len() && !owned.is_empty() {
            assert!(t.end - data.len() <= owned.len(), "{} is outside the copies", t.name);
        } else {
            assert!(t.end <= data.len(), "{} is outside the file", t.name);
        }
    }
});
