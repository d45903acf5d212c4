// Every kernel of bsr_kernels.cuh once, on a small ragged problem with empty and full block rows, under
// ThreadSanitizer: a missing __syncthreads shows as a data race on the shared-memory arrays (checked: deleting the
// barrier after the tensor-core kernel's shared-memory stores is reported at once). Not part of the pytest suite
// (about two minutes on two cores); run it after changing the kernels:
//
//   g++ -std=c++20 -O1 -g -fsanitize=thread -pthread -Itests/cuda_emu -Icuda_ext tests/cuda_emu/race_check.cpp \
//       -o /tmp/race_check && /tmp/race_check
//
// Correctness is tests/test_kernels.py's job; this only looks for races.
#include <string>

#include "emu.cpp"

int main() {
  int failed = 0;
  for (const Entry& e : kEntries) {
    const std::string name = e.name;
    const int b = name.find("_b16") != std::string::npos ? 16 : name.find("_b32") != std::string::npos ? 32 : 64;
    const std::size_t bytes = name.find("_f32") != std::string::npos ? 4 : 2;
    const bool skinny = name.find("skinny") != std::string::npos, dw = name.find("_dw_") != std::string::npos;
    const bool transposed = name.size() > 2 && name.compare(name.size() - 2, 2, "_t") == 0;
    // 3 x 3 blocks: block row 0 holds two, row 1 none, row 2 two; N and K ragged, rows strided by K + 8.
    const long long n = 3 * b - 5, k = 3 * b - 8, m = skinny ? 5 : 70;  // bt runs 70 rows too: its 16-row tiles
    std::vector<int> row_ptr = {0, 2, 2, 4}, col_idx = {0, 2, 1, 2}, perm = {0, 1, 2, 3}, row_idx = {0, 0, 2, 2};
    std::vector<unsigned char> x(m * (k + 8) * bytes), values(4 * b * b * bytes), grad(m * n * bytes);
    std::vector<unsigned char> out(m * n * bytes + 4 * b * b * bytes);
    PkParams p{};
    p.x = x.data(), p.values = values.data(), p.row_ptr = row_ptr.data(), p.col_idx = col_idx.data();
    p.perm = transposed ? perm.data() : nullptr, p.row_idx = row_idx.data(), p.out = out.data(), p.grad = grad.data();
    p.M = m, p.N = n, p.K = k, p.ldx = k + 8, p.ldo = n, p.ldg = n;
    const bool bt = name.find("_bt_") != std::string::npos;  // 16 rows per thread block
    const unsigned split = name.find("_s4") != std::string::npos ? 4 : name.find("_s2") != std::string::npos ? 2 : 1;
    const unsigned gx = dw ? 4 : 3 * split, gy = skinny ? 2 : bt ? (m + 15) / 16 : 1;  // what launch.py plans here
    if (int rc = emu_launch(e.name, gx, gy, 1, e.threads, 1, 1, &p)) {
      std::printf("%s: launch failed (%d)\n", e.name, rc);
      failed = 1;
    }
  }
  std::printf("ran %zu kernels\n", sizeof(kEntries) / sizeof(kEntries[0]));
  return failed;
}
