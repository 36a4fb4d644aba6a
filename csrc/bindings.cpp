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
#include <limits>
#include <sstream>
#include <string>

#include "batch_builder.h"
#include "block_allocator.h"

namespace py = pybind11;
using blip3o::BatchBuilder;
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

// ---------------------------------------------------------------------------------------------
// BatchBuilder helpers

// An integer numpy array from any array-like, refusing non-integer dtypes (no silent float cast).
py::array integer_array(const py::handle& obj, const char* name) {
  if (py::isinstance<py::str>(obj) || py::isinstance<py::bytes>(obj)) {
    throw py::type_error(std::string(name) + " must be integers, not str or bytes");
  }
  py::array arr = py::array::ensure(obj);
  if (!arr) throw py::error_already_set();
  const char kind = arr.dtype().kind();
  // An empty list becomes a float64 array; it holds no non-integer, so let it through as empty.
  if (kind != 'i' && kind != 'u' && arr.size() != 0) {
    throw py::type_error(std::string(name) + " must be integers, got dtype " +
                         std::string(py::str(arr.dtype())));
  }
  return arr;
}

using Int32Array = py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>;
using Int64Array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

// A 1-D block table as contiguous int32: read in place when it already is one, else converted
// through int64 with a range check (a plain int32 cast would wrap silently).
Int32Array block_ids_array(const py::handle& obj) {
  const py::array arr = integer_array(obj, "block_ids");
  if (arr.ndim() != 1) throw py::value_error("block_ids must be 1-D");
  if (arr.dtype().equal(py::dtype::of<std::int32_t>()) &&
      (arr.flags() & py::array::c_style) != 0) {
    return py::reinterpret_borrow<Int32Array>(arr);
  }
  const Int64Array wide = Int64Array::ensure(arr);
  if (!wide) throw py::error_already_set();
  Int32Array out(wide.shape(0));
  for (py::ssize_t k = 0; k < wide.shape(0); ++k) {
    const std::int64_t v = wide.data()[k];
    if (v < std::numeric_limits<std::int32_t>::min() || v > std::numeric_limits<std::int32_t>::max()) {
      throw py::value_error("block id " + std::to_string(v) + " does not fit in int32");
    }
    out.mutable_data()[k] = static_cast<std::int32_t>(v);
  }
  return out;
}

void add_sequence(BatchBuilder& b, const py::handle& block_ids, std::int64_t num_computed_tokens,
                  std::int64_t num_new_tokens, const py::handle& prompt_positions,
                  std::int64_t mrope_delta) {
  const Int32Array ids = block_ids_array(block_ids);
  const std::int64_t* pos = nullptr;
  std::int64_t num_pos = 0;
  Int64Array pos_arr;  // keeps a converted copy alive during the call
  if (!prompt_positions.is_none()) {
    const py::array arr = integer_array(prompt_positions, "prompt_positions");
    if (arr.ndim() != 2 || arr.shape(0) != 3) {
      throw py::value_error("prompt_positions must have shape [3, P]");
    }
    pos_arr = Int64Array::ensure(arr);
    if (!pos_arr) throw py::error_already_set();
    pos = pos_arr.data();
    num_pos = pos_arr.shape(1);
  }
  b.add_sequence(ids.data(), static_cast<std::size_t>(ids.shape(0)), num_computed_tokens,
                 num_new_tokens, pos, num_pos, mrope_delta);
}

void build(BatchBuilder& b, const py::sequence& block_ids, const py::sequence& num_computed_tokens,
           const py::sequence& num_new_tokens, const py::object& prompt_positions,
           const py::object& mrope_deltas) {
  const auto n = py::len(block_ids);
  const bool has_pos = !prompt_positions.is_none();
  const bool has_delta = !mrope_deltas.is_none();
  if (py::len(num_computed_tokens) != n || py::len(num_new_tokens) != n ||
      (has_pos && py::len(prompt_positions) != n) || (has_delta && py::len(mrope_deltas) != n)) {
    throw py::value_error("BatchBuilder.build: every per-sequence argument needs one entry per "
                          "sequence (" + std::to_string(n) + ")");
  }
  b.clear();
  try {
    for (std::size_t i = 0; i < n; ++i) {
      const py::object pos = has_pos ? py::object(prompt_positions[py::int_(i)]) : py::none();
      const std::int64_t delta = has_delta ? py::cast<std::int64_t>(mrope_deltas[py::int_(i)]) : 0;
      add_sequence(b, block_ids[i], py::cast<std::int64_t>(num_computed_tokens[i]),
                   py::cast<std::int64_t>(num_new_tokens[i]), pos, delta);
    }
  } catch (...) {
    b.clear();  // never leave half a batch behind
    throw;
  }
}

// A read-only numpy view of a builder-owned buffer; `owner` (the Python builder) stays alive as
// long as the view does.
py::array view(const py::object& owner, const std::int32_t* data, std::vector<py::ssize_t> shape,
               std::vector<py::ssize_t> strides_in_elements) {
  std::vector<py::ssize_t> strides;
  for (const py::ssize_t s : strides_in_elements) {
    strides.push_back(s * static_cast<py::ssize_t>(sizeof(std::int32_t)));
  }
  py::array arr(py::dtype::of<std::int32_t>(), std::move(shape), std::move(strides), data, owner);
  // Read-only: the buffers are the builder's; a write through a view would corrupt the batch.
  py::detail::array_proxy(arr.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return arr;
}

std::string repr_builder(const BatchBuilder& b) {
  std::ostringstream os;
  os << "BatchBuilder(block_size=" << b.block_size() << ", max_num_seqs=" << b.max_num_seqs()
     << ", max_num_tokens=" << b.max_num_tokens()
     << ", max_blocks_per_seq=" << b.max_blocks_per_seq() << ", num_seqs=" << b.num_seqs()
     << ", num_tokens=" << b.num_tokens() << ")";
  return os.str();
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
  m.doc() =
      "Native host runtime of blip3o_engine (C++17, no torch): the paged-KV block allocator and "
      "the per-step batch builder.";

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

  py::class_<BatchBuilder>(m, "BatchBuilder", R"doc(
Per-step AR batch metadata as flat int32 arrays, in buffers the builder owns (sized once from
the capacities). For S sequences and T new tokens in all, after build() the read-only, zero-copy
numpy views hold:
  block_tables [S, max_blocks_per_seq] (-1 padded), slot_mapping [T] (block*block_size+offset),
  positions [3, T] (M-RoPE t/h/w), cu_seqlens_q [S+1], context_lens [S] (computed + new),
  last_token_indices [S] (row of each sequence's last new token, the one sampled).
Token p of a sequence has position prompt_positions[:, p] while p < P (the prompt positions'
length) and p + mrope_delta on all three axes after that. A view stays valid as long as it lives
(it keeps the builder alive) but shows the latest batch: copy it before the next build().
See engine/batch_builder.h for the full contract.)doc")
      .def(py::init<std::int64_t, std::int64_t, std::int64_t, std::int64_t>(),
           py::arg("block_size"), py::arg("max_num_seqs"), py::arg("max_num_tokens"),
           py::arg("max_blocks_per_seq"))
      .def("clear", &BatchBuilder::clear, "Start a new, empty batch.")
      .def("add_sequence", &add_sequence, py::arg("block_ids"), py::arg("num_computed_tokens"),
           py::arg("num_new_tokens"), py::arg("prompt_positions") = py::none(),
           py::arg("mrope_delta") = 0,
           "Append one sequence: its block ids (1-D ints covering computed + new tokens), how "
           "many tokens are already computed and how many (>= 1) to compute now, optionally its "
           "prompt's M-RoPE positions [3, P] (any int dtype; int64 C-contiguous is read in place) "
           "and the delta of the positions after the prompt. Raises ValueError, leaving the batch "
           "unchanged, on a bad argument or when a capacity would overflow.")
      .def("build", &build, py::arg("block_ids"), py::arg("num_computed_tokens"),
           py::arg("num_new_tokens"), py::arg("prompt_positions") = py::none(),
           py::arg("mrope_deltas") = py::none(),
           "clear(), then add_sequence() for each sequence; per-sequence sequences of equal "
           "length (prompt_positions entries may be None). On an error the batch is left empty.")
      .def_property_readonly("block_size", &BatchBuilder::block_size)
      .def_property_readonly("max_num_seqs", &BatchBuilder::max_num_seqs)
      .def_property_readonly("max_num_tokens", &BatchBuilder::max_num_tokens)
      .def_property_readonly("max_blocks_per_seq", &BatchBuilder::max_blocks_per_seq)
      .def_property_readonly("num_seqs", &BatchBuilder::num_seqs)
      .def_property_readonly("num_tokens", &BatchBuilder::num_tokens)
      .def_property_readonly("max_query_len", &BatchBuilder::max_query_len,
                             "Most new tokens of any sequence in the batch (0 when empty).")
      .def_property_readonly("max_context_len", &BatchBuilder::max_context_len,
                             "Largest context_lens entry (0 when empty).")
      .def_property_readonly("block_tables",
                             [](const py::object& self) {
                               const auto& b = self.cast<const BatchBuilder&>();
                               return view(self, b.block_tables(), {b.num_seqs(), b.max_blocks_per_seq()},
                                           {b.max_blocks_per_seq(), 1});
                             })
      .def_property_readonly("slot_mapping",
                             [](const py::object& self) {
                               const auto& b = self.cast<const BatchBuilder&>();
                               return view(self, b.slot_mapping(), {b.num_tokens()}, {1});
                             })
      .def_property_readonly("positions",
                             [](const py::object& self) {
                               const auto& b = self.cast<const BatchBuilder&>();
                               // Rows are max_num_tokens apart: a strided [3, T] view, no copy.
                               return view(self, b.positions(), {3, b.num_tokens()},
                                           {b.max_num_tokens(), 1});
                             })
      .def_property_readonly("cu_seqlens_q",
                             [](const py::object& self) {
                               const auto& b = self.cast<const BatchBuilder&>();
                               return view(self, b.cu_seqlens_q(), {b.num_seqs() + 1}, {1});
                             })
      .def_property_readonly("context_lens",
                             [](const py::object& self) {
                               const auto& b = self.cast<const BatchBuilder&>();
                               return view(self, b.context_lens(), {b.num_seqs()}, {1});
                             })
      .def_property_readonly("last_token_indices",
                             [](const py::object& self) {
                               const auto& b = self.cast<const BatchBuilder&>();
                               return view(self, b.last_token_indices(), {b.num_seqs()}, {1});
                             })
      .def("__repr__", &repr_builder);
}
