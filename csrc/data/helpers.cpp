// Index builders for the GPT pretraining datasets (megatron_lime/data/gpt_dataset.py).
//
// build_sample_idx: where each packed sample of seq_length + 1 tokens starts.
//   The documents, in the order given by document_index (already shuffled, one block per
//   epoch), form one token stream. Sample i covers stream positions
//   [i * seq_length, i * seq_length + seq_length] (seq_length + 1 tokens; the last token of
//   sample i is the first of sample i + 1, because inputs are tokens[:-1] and labels
//   tokens[1:]). Row i of the result is (position in document_index, offset in that
//   document) of stream position i * seq_length; row num_samples is the end of the last
//   sample. This is the layout Megatron-LM's GPTDataset uses, so the semantics match.
//
// build_blending_indices: which dataset (and which of its samples) blended sample i is.
//   Greedy: each sample goes to the dataset furthest below its target share so far, so
//   after n samples every dataset has within one sample of weight * n.
//
// Both run in O(output) with the GIL released; inputs are checked and errors raise ValueError.
//
// pack_documents (megatron_lime/data/preprocess.py): tokenized documents, as tokenizers return
//   them (sequences of Python ints), back to back in one array: empty documents dropped, eod
//   appended to each kept one when eod >= 0. Returns (tokens, lengths int32, documents dropped).
//   Most of what a preprocessing worker does besides tokenizing; in one pass here it costs a
//   sixth of numpy.fromiter over itertools.chain (pack_documents_reference, its reference). It
//   reads Python objects, so it holds the GIL.
//
// charsmap_rules, WordRouter (megatron_lime/tokenizer/agreement.py): the rules of a sentencepiece
//   normaliser; and a standard sentencepiece model's encoder for the texts where sentencepiece provably gives
//   the ids of its Hugging Face conversion. A text qualifies when it holds none of the "unsafe" code points
//   and each of its words (runs between "space" code points) is known to be encoded alike by both; its ids are
//   then sentencepiece's ids of its words put together (no merge crosses a word there), each word encoded once
//   and kept (a bounded cache, as the tokenizers library keeps BPE words). A new word is known to agree when no
//   piece with two splits occurs twice in it, else it is checked against the conversion once; new words are
//   handed back to Python, which encodes them and calls learn(). One pass over each text's UTF-8;
//   SentencePieceAgreement.covers / .words / .doubtful are the Python reference. Our lossless models use the
//   same cache with words that keep their leading spaces (agreement.lossless_router).
//
// Plain C++ and pybind11 (no libtorch): preprocessing imports this without importing torch.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

namespace py = pybind11;

namespace {

template <typename Index>
py::array_t<Index> build_sample_idx(const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& sizes,
                                    const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& document_index,
                                    int64_t seq_length, int64_t num_samples) {
  if (sizes.ndim() != 1 || document_index.ndim() != 1) {
    throw std::invalid_argument("build_sample_idx: sizes and document_index must be 1-d");
  }
  if (seq_length < 1) {
    throw std::invalid_argument("build_sample_idx: seq_length must be >= 1, got " + std::to_string(seq_length));
  }
  if (num_samples < 0) {
    throw std::invalid_argument("build_sample_idx: num_samples must be >= 0");
  }
  const int64_t num_documents = sizes.shape(0);
  const int64_t index_length = document_index.shape(0);
  if (index_length > static_cast<int64_t>(std::numeric_limits<Index>::max())) {
    throw std::invalid_argument("build_sample_idx: document_index too long for the index dtype");
  }
  const int32_t* size = sizes.data();
  const int64_t* order = document_index.data();

  // Validate once (cheap next to the walk) so the walk needs no checks.
  int64_t total_tokens = 0;
  for (int64_t j = 0; j < index_length; ++j) {
    const int64_t doc = order[j];
    if (doc < 0 || doc >= num_documents) {
      throw std::invalid_argument("build_sample_idx: document_index[" + std::to_string(j) + "] = " + std::to_string(doc) +
                                  " is outside [0, " + std::to_string(num_documents) + ")");
    }
    if (size[doc] < 0) {
      throw std::invalid_argument("build_sample_idx: negative size for document " + std::to_string(doc));
    }
    total_tokens += size[doc];
  }
  if (total_tokens < 1) {
    throw std::invalid_argument("build_sample_idx: the documents have no tokens");
  }
  // The last sample ends at stream position num_samples * seq_length, which must exist.
  if (num_samples > 0 && num_samples * seq_length + 1 > total_tokens) {
    throw std::invalid_argument("build_sample_idx: " + std::to_string(num_samples) + " samples of " +
                                std::to_string(seq_length) + " + 1 tokens need " +
                                std::to_string(num_samples * seq_length + 1) + " tokens, the documents have " +
                                std::to_string(total_tokens));
  }

  py::array_t<Index> result({num_samples + 1, static_cast<int64_t>(2)});
  Index* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    int64_t j = 0;            // position in document_index
    int64_t doc_start = 0;    // stream position of document order[j]'s first token
    for (int64_t i = 0; i <= num_samples; ++i) {
      const int64_t position = i * seq_length;
      // Skip documents that end at or before `position` (empty documents are skipped too).
      while (doc_start + size[order[j]] <= position) {
        doc_start += size[order[j]];
        ++j;
      }
      out[2 * i] = static_cast<Index>(j);
      out[2 * i + 1] = static_cast<Index>(position - doc_start);
    }
  }
  return result;
}

py::tuple build_blending_indices(const py::array_t<double, py::array::c_style | py::array::forcecast>& weights,
                                 int64_t size) {
  if (weights.ndim() != 1 || weights.shape(0) < 1) {
    throw std::invalid_argument("build_blending_indices: weights must be a non-empty 1-d array");
  }
  const int64_t num_datasets = weights.shape(0);
  if (num_datasets > std::numeric_limits<int16_t>::max()) {
    throw std::invalid_argument("build_blending_indices: at most 32767 datasets");
  }
  if (size < 0) {
    throw std::invalid_argument("build_blending_indices: size must be >= 0");
  }
  const double* weight = weights.data();
  double total = 0.0;
  for (int64_t d = 0; d < num_datasets; ++d) {
    if (!(weight[d] >= 0.0) || !std::isfinite(weight[d])) {
      throw std::invalid_argument("build_blending_indices: weights must be finite and >= 0");
    }
    total += weight[d];
  }
  if (total <= 0.0) {
    throw std::invalid_argument("build_blending_indices: weights sum to zero");
  }

  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t* which = dataset_index.mutable_data();
  int64_t* sample = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<double> share(num_datasets);
    for (int64_t d = 0; d < num_datasets; ++d) share[d] = weight[d] / total;
    std::vector<int64_t> taken(num_datasets, 0);
    for (int64_t i = 0; i < size; ++i) {
      // Deficit of dataset d once sample i is placed: share * (i + 1) - taken.
      int64_t best = 0;
      double best_deficit = -std::numeric_limits<double>::infinity();
      for (int64_t d = 0; d < num_datasets; ++d) {
        const double deficit = share[d] * static_cast<double>(i + 1) - static_cast<double>(taken[d]);
        if (deficit > best_deficit) {
          best_deficit = deficit;
          best = d;
        }
      }
      which[i] = static_cast<int16_t>(best);
      sample[i] = taken[best]++;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

template <typename Token>
py::tuple pack_documents(const py::object& encoded, int64_t eod) {
  constexpr long long max_id = std::numeric_limits<Token>::max();
  if (eod > max_id) {
    throw std::invalid_argument("pack_documents: eod id " + std::to_string(eod) + " does not fit the token type");
  }
  PyObject* outer = PySequence_Fast(encoded.ptr(), "pack_documents: expected a sequence of documents");
  if (outer == nullptr) throw py::error_already_set();
  const py::object outer_ref = py::reinterpret_steal<py::object>(outer);
  const Py_ssize_t num_documents = PySequence_Fast_GET_SIZE(outer);
  PyObject** documents = PySequence_Fast_ITEMS(outer);
  const int64_t extra = eod >= 0 ? 1 : 0;

  // Pass 1: sizes (a list is its own fast sequence, so this only takes references).
  std::vector<py::object> fast(num_documents);
  size_t total = 0;
  Py_ssize_t kept = 0;
  for (Py_ssize_t i = 0; i < num_documents; ++i) {
    PyObject* document = PySequence_Fast(documents[i], "pack_documents: a document must be a sequence of token ids");
    if (document == nullptr) throw py::error_already_set();
    fast[i] = py::reinterpret_steal<py::object>(document);
    const Py_ssize_t length = PySequence_Fast_GET_SIZE(document);
    if (length + extra > std::numeric_limits<int32_t>::max()) {
      throw std::invalid_argument("pack_documents: document " + std::to_string(i) + " has more than 2^31 tokens");
    }
    if (length > 0) {
      ++kept;
      total += static_cast<size_t>(length + extra);
    }
  }

  // Pass 2: the ids, checked to fit the token type.
  py::array_t<Token> tokens(static_cast<py::ssize_t>(total));
  py::array_t<int32_t> lengths(kept);
  Token* out = tokens.mutable_data();
  int32_t* length_out = lengths.mutable_data();
  for (Py_ssize_t i = 0; i < num_documents; ++i) {
    PyObject* document = fast[i].ptr();
    const Py_ssize_t length = PySequence_Fast_GET_SIZE(document);
    if (length == 0) continue;
    PyObject** ids = PySequence_Fast_ITEMS(document);
    for (Py_ssize_t j = 0; j < length; ++j) {
      const long long id = PyLong_AsLongLong(ids[j]);
      if (id == -1 && PyErr_Occurred()) throw py::error_already_set();
      if (id < 0 || id > max_id) {
        throw std::invalid_argument("pack_documents: token id " + std::to_string(id) + " (document " +
                                    std::to_string(i) + ") does not fit the token type");
      }
      *out++ = static_cast<Token>(id);
    }
    if (extra) *out++ = static_cast<Token>(eod);
    *length_out++ = static_cast<int32_t>(length + extra);
  }
  return py::make_tuple(tokens, lengths, num_documents - kept);
}

// Every key -> value of a sentencepiece precompiled charsmap: a Darts-clone double-array trie of
// UTF-8 keys (a u32 byte size, then the units) followed by the NUL-terminated values
// (tokenizer/agreement.py). Walks all 255 byte labels of every node: too slow in Python.
py::dict charsmap_rules(const py::bytes& charsmap) {
  const std::string blob = charsmap;
  py::dict rules;
  if (blob.empty()) return rules;
  if (blob.size() < 4) throw std::invalid_argument("charsmap_rules: charsmap shorter than its header");
  uint32_t trie_bytes = 0;
  std::memcpy(&trie_bytes, blob.data(), 4);
  if (trie_bytes % 4 != 0 || 4 + static_cast<size_t>(trie_bytes) > blob.size()) {
    throw std::invalid_argument("charsmap_rules: trie size does not fit the charsmap");
  }
  std::vector<uint32_t> units(trie_bytes / 4);
  std::memcpy(units.data(), blob.data() + 4, trie_bytes);
  const std::string pool = blob.substr(4 + trie_bytes);
  if (units.empty()) return rules;
  auto offset = [](uint32_t unit) { return (unit >> 10) << ((unit & (1u << 9)) >> 6); };
  std::vector<std::pair<size_t, std::string>> stack = {{offset(units[0]), std::string()}};
  while (!stack.empty()) {
    auto [node, key] = std::move(stack.back());
    stack.pop_back();
    for (uint32_t byte = 1; byte < 256; ++byte) {
      const size_t child = node ^ byte;
      if (child >= units.size() || (units[child] & ((1u << 31) | 0xFFu)) != byte) continue;
      const size_t next = child ^ offset(units[child]);
      std::string longer = key + static_cast<char>(byte);
      if ((units[child] >> 8) & 1u) {
        if (next >= units.size()) throw std::invalid_argument("charsmap_rules: leaf outside the trie");
        const size_t start = units[next] & ((1u << 31) - 1);
        const size_t end = pool.find('\0', start);
        if (start > pool.size() || end == std::string::npos) {
          throw std::invalid_argument("charsmap_rules: value outside the string pool");
        }
        rules[py::str(longer)] = py::str(pool.substr(start, end - start));
      }
      stack.emplace_back(next, std::move(longer));
    }
  }
  return rules;
}

// Decodes one UTF-8 code point at p (valid UTF-8: Python produced it); advances p.
inline uint32_t next_code_point(const unsigned char*& p) {
  const uint32_t c = *p++;
  if (c < 0x80) return c;
  if (c < 0xE0) return ((c & 0x1F) << 6) | (*p++ & 0x3F);
  if (c < 0xF0) {
    const uint32_t c1 = *p++ & 0x3F;
    return ((c & 0x0F) << 12) | (c1 << 6) | (*p++ & 0x3F);
  }
  const uint32_t c1 = *p++ & 0x3F, c2 = *p++ & 0x3F;
  return ((c & 0x07) << 18) | (c1 << 12) | (c2 << 6) | (*p++ & 0x3F);
}

// Words (UTF-8 bytes) -> (verdict, sentencepiece's ids), by open addressing over one arena of 32-bit units; a
// record is [word bytes, ids count | verdict bit, word bytes padded to units, ids], so one lookup touches a
// slot and one record.
class WordCache {
 public:
  static constexpr size_t kMissing = ~size_t{0};

  static uint64_t hash(const unsigned char* p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xC2B2AE3D27D4EB4Full);
    for (; n >= 8; p += 8, n -= 8) {
      uint64_t chunk;
      std::memcpy(&chunk, p, 8);
      h = (h ^ chunk) * 0xFF51AFD7ED558CCDull;
      h ^= h >> 32;
    }
    uint64_t tail = 0;
    std::memcpy(&tail, p, n);
    h = (h ^ tail) * 0xC4CEB9FE1A85EC53ull;
    h ^= h >> 29;
    return h | 1;  // 0 marks an empty slot
  }

  // The record of a word, or kMissing.
  size_t find(uint64_t h, const unsigned char* p, size_t n) const {
    if (slots_.empty()) return kMissing;
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.hash == 0) return kMissing;
      if (s.hash == h && arena_[s.record] == n && std::memcmp(arena_.data() + s.record + 2, p, n) == 0) {
        return s.record;
      }
    }
  }

  bool agrees(size_t record) const { return (arena_[record + 1] >> 31) != 0; }
  const uint32_t* ids(size_t record, size_t* count) const {
    *count = arena_[record + 1] & 0x7FFFFFFFu;
    return arena_.data() + record + 2 + units(arena_[record]);
  }

  void insert(uint64_t h, const unsigned char* p, size_t n, bool agrees, const std::vector<uint32_t>& ids) {
    if (2 * (size_ + 1) > slots_.size()) grow();
    size_t i = h & mask_;
    while (slots_[i].hash != 0) i = (i + 1) & mask_;
    slots_[i] = Slot{h, arena_.size()};
    const size_t count = agrees ? ids.size() : 0;  // a differing word's ids are never used
    arena_.push_back(static_cast<uint32_t>(n));
    arena_.push_back(static_cast<uint32_t>(count) | (agrees ? 0x80000000u : 0u));
    arena_.resize(arena_.size() + units(n), 0);
    std::memcpy(arena_.data() + arena_.size() - units(n), p, n);
    arena_.insert(arena_.end(), ids.begin(), ids.begin() + count);
    ++size_;
    agreeing_ += agrees;
  }

  // Bounded memory: drops the agreeing words (encoded again when met), keeps the differing ones.
  void forget_agreeing() {
    std::vector<Slot> old;
    old.swap(slots_);
    std::vector<uint32_t> arena;
    arena.swap(arena_);
    mask_ = size_ = agreeing_ = 0;
    for (const Slot& s : old) {
      if (s.hash == 0 || (arena[s.record + 1] >> 31) != 0) continue;
      insert(s.hash, reinterpret_cast<const unsigned char*>(arena.data() + s.record + 2), arena[s.record], false, {});
    }
  }

  size_t agreeing() const { return agreeing_; }
  size_t differing() const { return size_ - agreeing_; }

 private:
  struct Slot {
    uint64_t hash;
    size_t record;  // into arena_
  };
  static size_t units(size_t bytes) { return (bytes + 3) / 4; }

  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(std::max<size_t>(1024, 2 * old.size()), Slot{0, 0});
    mask_ = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.hash == 0) continue;
      size_t i = s.hash & mask_;
      while (slots_[i].hash != 0) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;  // at most half full
  size_t mask_ = 0, size_ = 0, agreeing_ = 0;
  std::vector<uint32_t> arena_;
};

// The pieces with two or more splits as a byte trie: is_doubtful() walks it from each character of a word, a
// few steps each, where hashing every substring up to the longest piece cost a hash per (start, end).
class PieceTrie {
 public:
  explicit PieceTrie(const std::vector<std::string>& pieces) {
    size_t bytes = 1;
    for (const std::string& piece : pieces) bytes += piece.size();
    size_t slots = 1024;
    while (slots < 2 * bytes) slots *= 2;
    edges_.assign(slots, Edge{0, 0});
    mask_ = slots - 1;
    piece_of_.push_back(-1);  // node 0: the root
    for (size_t k = 0; k < pieces.size(); ++k) {
      uint32_t node = 0;
      for (unsigned char byte : pieces[k]) {
        uint32_t next = child(node, byte);
        if (next == 0) {
          next = static_cast<uint32_t>(piece_of_.size());
          piece_of_.push_back(-1);
          add_edge(node, byte, next);
        }
        node = next;
      }
      piece_of_[node] = static_cast<int32_t>(k);
    }
  }

  // The child of node by byte; 0 when there is none (the root is nobody's child).
  uint32_t child(uint32_t node, unsigned char byte) const {
    const uint64_t key = key_of(node, byte);
    for (size_t i = slot_of(key);; i = (i + 1) & mask_) {
      if (edges_[i].key == key) return edges_[i].child;
      if (edges_[i].key == 0) return 0;
    }
  }

  int32_t piece_at(uint32_t node) const { return piece_of_[node]; }  // the piece ending at node, or -1

 private:
  struct Edge {
    uint64_t key;  // (node << 8 | byte) + 1; 0 marks an empty slot
    uint32_t child;
  };
  static uint64_t key_of(uint32_t node, unsigned char byte) { return ((uint64_t{node} << 8) | byte) + 1; }
  size_t slot_of(uint64_t key) const { return ((key * 0x9E3779B97F4A7C15ull) >> 20) & mask_; }

  void add_edge(uint32_t node, unsigned char byte, uint32_t next) {
    const uint64_t key = key_of(node, byte);
    size_t i = slot_of(key);
    while (edges_[i].key != 0) i = (i + 1) & mask_;
    edges_[i] = Edge{key, next};
  }

  std::vector<Edge> edges_;  // open addressing, at most half full
  size_t mask_ = 0;
  std::vector<int32_t> piece_of_;
};

class WordRouter {
 public:
  static constexpr int kSentencePiece = 0, kConversion = 1, kUnknownWords = 2;

  // multi_split: the pieces with two or more splits into pieces (UTF-8, U+2581 as in the model), when the
  // model allows the shortcut (prove); then a new word in which none of them occurs twice is known to agree
  // without being encoded by the conversion (tokenizer/agreement.py).
  //
  // leading_spaces: a word is a run of spaces and the run of other characters after it, spaces kept (our lossless
  // models: no normaliser, and no piece holds a space after another character, so no merge crosses into a run
  // of spaces); otherwise words are the runs between spaces, which the normaliser collapses (standard models).
  WordRouter(const std::vector<uint32_t>& unsafe, const std::vector<uint32_t>& spaces, size_t limit, bool prove,
             const std::vector<std::string>& multi_split, bool leading_spaces)
      : kind_(0x110000, 0), limit_(limit), prove_(prove), leading_spaces_(leading_spaces), multi_split_(multi_split) {
    for (uint32_t c : spaces) set_kind(c, kSpace);
    for (uint32_t c : unsafe) set_kind(c, kUnsafe);
  }

  // (ids per text or None, status per text, the words met for the first time in order of appearance, whether
  // each must be checked against the conversion). Status 0: every word known to agree, and the ids are its
  // words' ids put together; 1: an unsafe character or a word known to differ (encode it by the conversion);
  // 2: some word not known yet and none known to differ (learn the new words, then encode it again).
  py::tuple encode(const py::list& texts) {
    py::list ids(texts.size());
    std::vector<int> status(texts.size(), kSentencePiece);
    std::unordered_set<std::string_view> handed;
    py::list words;
    std::vector<bool> doubtful;
    for (size_t i = 0; i < texts.size(); ++i) {
      PyObject* text = texts[i].ptr();
      if (!PyUnicode_Check(text)) throw std::invalid_argument("WordRouter.encode: texts must be str");
      Py_ssize_t size = 0;
      const char* data = PyUnicode_AsUTF8AndSize(text, &size);
      if (data == nullptr) throw py::error_already_set();
      status[i] = encode_one(reinterpret_cast<const unsigned char*>(data), size);
      if (status[i] == kSentencePiece) {
        PyObject* list = PyList_New(static_cast<Py_ssize_t>(ids_.size()));
        if (list == nullptr) throw py::error_already_set();
        for (size_t k = 0; k < ids_.size(); ++k) PyList_SET_ITEM(list, k, PyLong_FromUnsignedLong(ids_[k]));
        ids[i] = py::reinterpret_steal<py::object>(list);
        continue;
      }
      ids[i] = py::none();
      if (status[i] == kUnknownWords) {
        for (std::string_view word : unknown_) {
          if (!handed.insert(word).second) continue;  // views into texts, alive for this call
          words.append(py::str(word.data(), word.size()));
          doubtful.push_back(!prove_ || is_doubtful(reinterpret_cast<const unsigned char*>(word.data()), word.size()));
        }
      }
    }
    return py::make_tuple(ids, status, words, doubtful);
  }

  // Remember words encode() handed back: sentencepiece's ids of each, and whether the conversion gives the same.
  // Past the limit the agreeing words known so far are forgotten first, so all of these are known after it.
  void learn(const std::vector<std::string>& words, const std::vector<std::vector<uint32_t>>& ids,
             const std::vector<bool>& agree) {
    if (words.size() != agree.size() || words.size() != ids.size()) {
      throw std::invalid_argument("WordRouter.learn: one list of ids and one verdict per word");
    }
    if (cache_.agreeing() + words.size() > limit_) cache_.forget_agreeing();
    for (size_t k = 0; k < words.size(); ++k) {
      const auto* p = reinterpret_cast<const unsigned char*>(words[k].data());
      const uint64_t h = WordCache::hash(p, words[k].size());
      if (cache_.find(h, p, words[k].size()) == WordCache::kMissing) {
        cache_.insert(h, p, words[k].size(), agree[k], ids[k]);
      }
    }
  }

  size_t agreeing() const { return cache_.agreeing(); }
  size_t differing() const { return cache_.differing(); }

 private:
  static constexpr uint8_t kSpace = 1, kUnsafe = 2;

  void set_kind(uint32_t c, uint8_t kind) {
    if (c >= kind_.size()) throw std::invalid_argument("WordRouter: code point out of range");
    kind_[c] = kind;
  }

  // True when some multi-split piece occurs at two places in U+2581 + word: only then can the encoders'
  // different tie orders meet (two pending merges forming the same piece with different splits).
  bool is_doubtful(const unsigned char* word, size_t size) {
    static constexpr unsigned char kMeta[3] = {0xE2, 0x96, 0x81};
    if (size <= 2) return false;  // U+2581 + at most two characters holds a piece of 3+ characters at most once
    const size_t n = size + 3;
    auto byte_at = [&](size_t k) { return k < 3 ? kMeta[k] : word[k - 3]; };
    seen_.clear();
    for (size_t i = 0; i < n; ++i) {
      if ((byte_at(i) & 0xC0) == 0x80) continue;  // a piece starts at a character
      uint32_t node = 0;
      for (size_t k = i; k < n && (node = multi_split_.child(node, byte_at(k))) != 0; ++k) {
        const int32_t piece = multi_split_.piece_at(node);
        if (piece < 0) continue;
        if (std::find(seen_.begin(), seen_.end(), piece) != seen_.end()) return true;
        seen_.push_back(piece);
      }
    }
    return false;
  }

  // One text: its status; for status 0 its ids in ids_, for status 2 its unknown words in unknown_.
  int encode_one(const unsigned char* p, Py_ssize_t size) {
    const unsigned char* end = p + size;
    const unsigned char* word = nullptr;  // start of the current word
    ids_.clear();
    unknown_.clear();
    auto agrees_or_unknown = [&](const unsigned char* stop) {  // false: the word is known to differ
      const size_t n = stop - word;
      const unsigned char* start = word;
      word = nullptr;
      const size_t record = cache_.find(WordCache::hash(start, n), start, n);
      if (record == WordCache::kMissing) {
        unknown_.emplace_back(reinterpret_cast<const char*>(start), n);
        return true;
      }
      if (!cache_.agrees(record)) return false;
      if (unknown_.empty()) {
        size_t count = 0;
        const uint32_t* ids = cache_.ids(record, &count);
        ids_.insert(ids_.end(), ids, ids + count);
      }
      return true;
    };
    bool other = false;  // leading_spaces_: the current word has a character other than a space
    while (p < end) {
      const unsigned char* here = p;
      const uint8_t kind = *p < 0x80 ? kind_[*p++] : kind_[next_code_point(p)];
      if (kind == kUnsafe) return kConversion;
      if (kind == kSpace) {
        if (leading_spaces_) {
          if (other && !agrees_or_unknown(here)) return kConversion;
          if (word == nullptr) word = here;
          other = false;
        } else if (word != nullptr && !agrees_or_unknown(here)) {
          return kConversion;
        }
      } else {
        if (word == nullptr) word = here;
        other = true;
      }
    }
    if (word != nullptr && !agrees_or_unknown(end)) return kConversion;
    return unknown_.empty() ? kSentencePiece : kUnknownWords;
  }

  std::vector<uint8_t> kind_;  // per code point: 0 word character, kSpace, kUnsafe
  WordCache cache_;
  size_t limit_;
  bool prove_;
  bool leading_spaces_;
  PieceTrie multi_split_;
  std::vector<uint32_t> ids_;
  std::vector<std::string_view> unknown_;
  std::vector<int32_t> seen_;
};

}  // namespace

PYBIND11_MODULE(_data_helpers, m) {
  m.doc() = "Sample and blending index builders (megatron_lime.data), and pack_documents for preprocessing";
  m.def("build_sample_idx_int32", &build_sample_idx<int32_t>, py::arg("sizes"), py::arg("document_index"),
        py::arg("seq_length"), py::arg("num_samples"),
        "Sample index (num_samples + 1, 2) int32: (position in document_index, offset) of each sample's first token.");
  m.def("build_sample_idx_int64", &build_sample_idx<int64_t>, py::arg("sizes"), py::arg("document_index"),
        py::arg("seq_length"), py::arg("num_samples"), "As build_sample_idx_int32, int64 (document_index >= 2^31 entries).");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "(dataset_index int16[size], dataset_sample_index int64[size]) realising the weights greedily.");
  m.def("pack_documents_uint16", &pack_documents<uint16_t>, py::arg("encoded"), py::arg("eod"),
        "(tokens uint16, lengths int32, documents dropped): documents back to back, empty ones dropped, eod "
        "appended when >= 0.");
  m.def("pack_documents_int32", &pack_documents<int32_t>, py::arg("encoded"), py::arg("eod"),
        "As pack_documents_uint16, int32 tokens (vocabularies of 65,500 ids or more).");
  m.def("charsmap_rules", &charsmap_rules, py::arg("charsmap"),
        "{key: value} of a sentencepiece precompiled charsmap (its normalisation rules).");
  py::class_<WordRouter>(m, "WordRouter",
                         "Encodes texts word by word from a cache of sentencepiece's ids per word, where that "
                         "provably gives the model's ids (tokenizer/agreement.py).")
      .def(py::init<const std::vector<uint32_t>&, const std::vector<uint32_t>&, size_t, bool,
                    const std::vector<std::string>&, bool>(),
           py::arg("unsafe"), py::arg("spaces"), py::arg("limit"), py::arg("prove"), py::arg("multi_split"),
           py::arg("leading_spaces") = false)
      .def("encode", &WordRouter::encode, py::arg("texts"),
           "(ids or None per text; status per text: 0 encoded, 1 conversion, 2 new words; the new words; whether "
           "each must be checked against the conversion).")
      .def("learn", &WordRouter::learn, py::arg("words"), py::arg("ids"), py::arg("agree"))
      .def_property_readonly("agreeing", &WordRouter::agreeing)
      .def_property_readonly("differing", &WordRouter::differing);
}
