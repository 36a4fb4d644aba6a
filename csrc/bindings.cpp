// pybind11 bindings: `blip3o_engine._C` exposes the C++ host runtime in engine/ to Python.
//
// Conventions at this boundary:
//   - Hashes and `extra` keys are Python ints taken modulo 2**64 (so a negative int, e.g. from
//     Python's hash(), is accepted); hashes come back as ints in [0, 2**64).
//   - Token ids may be any iterable of ints, or a 1-D numpy integer array. int32/int64 arrays
//     are read in place through the buffer protocol (any stride, no copy).
//   - C++ exceptions map to Python ones: std::invalid_argument -> ValueError,
//     std::out_of_range -> IndexError, OutOfBlocksError -> _C.OutOfBlocksError (a RuntimeError),
//     InvariantError -> _C.InvariantError (a RuntimeError).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>

#include "block_allocator.h"

namespace py = pybind11;
using blip3o::BlockAllocator;
using blip3o::BlockHash;
using blip3o::BlockHasher;
using blip3o::BlockId;

namespace blip3o_bindings {

// A 64-bit hash as it crosses the boundary: any Python int (or object with __index__), reduced
// modulo 2**64. A distinct type so that pybind11 shows it as `int` in signatures.
struct Hash64 {
  std::uint64_t value = 0;
};

}  // namespace blip3o_bindings

using blip3o_bindings::Hash64;

namespace pybind11 {
namespace detail {

template <>
struct type_caster<Hash64> {
  PYBIND11_TYPE_CASTER(Hash64, const_name("int"));

  bool load(handle src, bool /*convert*/) {
    // Only true integers (and __index__ types such as numpy ints); floats are rejected.
    object index = reinterpret_steal<object>(PyNumber_Index(src.ptr()));
    if (!index) {
      PyErr_Clear();
      return false;
    }
    value.value = PyLong_AsUnsignedLongLongMask(index.ptr());
    if (PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }

  static handle cast(Hash64 src, return_value_policy, handle) {
    return PyLong_FromUnsignedLongLong(src.value);
  }
};

}  // namespace detail
}  // namespace pybind11

namespace {

// Reads `n` elements of type T spaced `stride` bytes apart, straight from the array's buffer.
template <typename T>
BlockHash hash_strided(BlockHasher hasher, const char* data, py::ssize_t n, py::ssize_t stride) {
  for (py::ssize_t i = 0; i < n; ++i) {
    hasher.add(static_cast<std::int64_t>(*reinterpret_cast<const T*>(data + i * stride)));
  }
  return hasher.finish();
}

BlockHash hash_numpy(BlockHasher hasher, const py::array& arr) {
  if (arr.ndim() != 1) {
    throw py::value_error("token_ids must be 1-D, got an array with " +
                          std::to_string(arr.ndim()) + " dimensions");
  }
  const char kind = arr.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    throw py::type_error("token_ids must be an integer array, got dtype " +
                         std::string(py::str(arr.dtype())));
  }
  const auto* data = static_cast<const char*>(arr.data());
  if (arr.dtype().equal(py::dtype::of<std::int32_t>())) {
    return hash_strided<std::int32_t>(hasher, data, arr.shape(0), arr.strides(0));
  }
  if (arr.dtype().equal(py::dtype::of<std::int64_t>())) {
    return hash_strided<std::int64_t>(hasher, data, arr.shape(0), arr.strides(0));
  }
  // Rare dtypes (int16, uint32, byte-swapped, ...): one converting copy to native int64.
  using Int64Array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;
  const Int64Array converted = Int64Array::ensure(arr);
  if (!converted) throw py::error_already_set();
  return hash_strided<std::int64_t>(hasher, reinterpret_cast<const char*>(converted.data()),
                                    converted.shape(0), sizeof(std::int64_t));
}

Hash64 hash_block(Hash64 parent_hash, const py::handle& token_ids, Hash64 extra) {
  BlockHasher hasher(parent_hash.value, extra.value);
  if (py::isinstance<py::array>(token_ids)) {
    return {hash_numpy(hasher, py::reinterpret_borrow<py::array>(token_ids))};
  }
  if (py::isinstance<py::str>(token_ids) || py::isinstance<py::bytes>(token_ids)) {
    throw py::type_error("token_ids must be a sequence of ints, not str or bytes");
  }
  for (const py::handle item : py::iter(token_ids)) {
    py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(item.ptr()));
    if (!index) throw py::error_already_set();  // TypeError: not an integer
    int overflow = 0;
    const long long token = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (overflow != 0) throw py::value_error("token id does not fit in int64");
    if (token == -1 && PyErr_Occurred()) throw py::error_already_set();
    hasher.add(static_cast<std::int64_t>(token));
  }
  return {hasher.finish()};
}

std::string repr(const BlockAllocator& a) {
  std::ostringstream os;
  os << "BlockAllocator(num_blocks=" << a.num_blocks() << ", block_size=" << a.block_size()
     << ", enable_prefix_caching=" << (a.enable_prefix_caching() ? "True" : "False")
     << ", free=" << a.num_free_blocks() << ", evictable=" << a.num_evictable_blocks()
     << ", cached=" << a.num_cached_blocks() << ")";
  return os.str();
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Native host runtime of blip3o_engine (C++17, no torch): the paged-KV block allocator.";

  py::register_exception<blip3o::OutOfBlocksError>(m, "OutOfBlocksError", PyExc_RuntimeError);
  py::register_exception<blip3o::InvariantError>(m, "InvariantError", PyExc_RuntimeError);

  py::class_<BlockAllocator>(m, "BlockAllocator", R"doc(
Paged-KV block allocator: ref-counted blocks, a LIFO free list, and a prefix cache whose
unreferenced cached blocks wait in an LRU until revived by lookup() or evicted (oldest first) by
allocate(). Every block is exactly one of: in use (ref > 0), free, evictable (cached, ref 0).
Not thread-safe. See engine/block_allocator.h for the full contract.)doc")
      .def(py::init<std::int64_t, std::int64_t, bool>(), py::arg("num_blocks"),
           py::arg("block_size"), py::arg("enable_prefix_caching") = true)
      .def("allocate", &BlockAllocator::allocate,
           "Take a block (ref count 1): from the free list, else by evicting the oldest evictable "
           "cached block. Raises OutOfBlocksError when every block is in use.")
      .def("free", &BlockAllocator::free, py::arg("block_id"),
           "Drop one reference; at 0 a cached block becomes evictable, any other block free. "
           "Raises ValueError if the ref count is already 0, IndexError for a bad id.")
      .def("incref", &BlockAllocator::incref, py::arg("block_id"),
           "Add a reference to a block in use. Raises ValueError if it is not in use.")
      .def(
          "lookup",
          [](BlockAllocator& a, Hash64 block_hash) { return a.lookup(block_hash.value); },
          py::arg("block_hash"),
          "Return the id of the block cached under block_hash, taking a reference (reviving it "
          "if evictable), or -1 on a miss or with prefix caching disabled.")
      .def(
          "register",
          [](BlockAllocator& a, BlockId block_id, Hash64 block_hash) {
            return a.register_block(block_id, block_hash.value);
          },
          py::arg("block_id"), py::arg("block_hash"),
          "Mark an in-use, full block as holding the content hashed as block_hash. Returns True "
          "if it is now the cache entry for that hash, False if prefix caching is off or another "
          "block already holds the hash (this block then stays uncached). Raises ValueError if "
          "the block is not in use or is cached under a different hash.")
      .def_static("hash_block", &hash_block, py::arg("parent_hash"), py::arg("token_ids"),
                  py::arg("extra") = Hash64{},
                  "Deterministic 64-bit hash of a block: FNV-1a 64 over the 8 little-endian "
                  "bytes of each of parent_hash, extra, every token id (as int64), and the token "
                  "count, then MurmurHash3's fmix64. parent_hash is 0 for the first block; extra "
                  "carries other content keys (e.g. an image hash). Ints are taken mod 2**64. "
                  "token_ids: an iterable of ints or a 1-D integer numpy array (int32/int64 "
                  "arrays are read in place).")
      .def("ref_count", &BlockAllocator::ref_count, py::arg("block_id"))
      .def("check_invariants", &BlockAllocator::check_invariants,
           "Verify the internal state (O(num_blocks)); raises InvariantError on a violation.")
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("block_size", &BlockAllocator::block_size)
      .def_property_readonly("enable_prefix_caching", &BlockAllocator::enable_prefix_caching)
      .def_property_readonly("num_free_blocks", &BlockAllocator::num_free_blocks,
                             "Blocks allocate() can hand out: free list + evictable.")
      .def_property_readonly("num_evictable_blocks", &BlockAllocator::num_evictable_blocks,
                             "Cached blocks with ref count 0, waiting in the LRU.")
      .def_property_readonly("num_cached_blocks", &BlockAllocator::num_cached_blocks,
                             "Blocks holding a registered hash, in use or evictable.")
      .def("__repr__", &repr);
}
