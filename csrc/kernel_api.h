// The kernels' entry points, declared once for every namespace that implements them: kx::cpu
// (the dispatcher), each CPU instruction-set path kx::cpu::<path>, and kx::cuda. Included inside
// those namespaces, after kernels.h's types: no include guard on purpose.

// Adds row r's magnitudes to task task_of_row[r]'s histogram of sel's current round.
void magnitude_histogram(const TaskRows& x, const DareSpec& d, const std::vector<int64_t>& task_of_row,
                         MagnitudeSelect& sel);
// TIES with exact thresholds (one per row): writes out (P elements, x's dtype).
void ties_apply(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                void* out, TiesPending& pending);
// Rewrites the listed positions with the elected sign `majority` (+1, -1 or 0).
void ties_fix_majority(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds,
                       float lam, int majority, const std::vector<int64_t>& positions, void* out);
// The whole in-memory TIES merge of one array, thresholds per row; returns them.
std::vector<float> ties_merge(const TaskRows& x, const DareSpec& d, double top_k, float lam, void* out);
// out = sum_r weights[r] * dare(row r). Returns false if the input had NaN or Inf.
bool weighted_sum(const TaskRows& x, const DareSpec& d, const std::vector<float>& weights, void* out);

// The same kernels on rows given as factors (TaskFactors): no task's row is ever stored. Same
// results as the row kernels on the materialised rows (float32 out, m x c).
void factored_histogram(const TaskFactors& f, const DareSpec& d, const std::vector<int64_t>& task_of_row,
                        MagnitudeSelect& sel);
void factored_ties_apply(const TaskFactors& f, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                         float* out, TiesPending& pending);
void factored_ties_fix_majority(const TaskFactors& f, const DareSpec& d, const std::vector<float>& thresholds,
                                float lam, int majority, const std::vector<int64_t>& positions, float* out);
bool factored_weighted_sum(const TaskFactors& f, const DareSpec& d, const std::vector<float>& weights, float* out);
